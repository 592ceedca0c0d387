"""Loss weights (and column groups) from a KoeMorph YAML config.

The seed's ``configs/dual_stream_config.yaml`` has a top-level section::

    loss:
      mse_weight: 1.0
      l1_weight: 0.1
      perceptual_weight: 0.5
      temporal_weight: 0.2
      smoothing_weight: 0.1

The original KoeMorph code keeps its configs the Hydra way: the loss section
sits in ``training/default.yaml`` with a ``_target_:`` naming the loss class,
and the main ``dual_stream_config.yaml`` only pulls it in through its
``defaults:`` list (composed by Hydra into ``training.loss``). So
:func:`load_loss_config` and :func:`load_loss_weights` look for the section in
these places, in this order, and take the first they find:

* ``loss:``, ``training.loss:``, ``model.loss:`` of the file itself;
* the same places in the config that the file's Hydra ``defaults:`` list
  composes: each ``group: option`` entry reads ``<group>/<option>.yaml`` next
  to the file into ``<group>`` (``group@package`` and a ``# @package`` header
  move it, ``optional`` and ``override`` entries are followed, ``_self_``
  decides whether the file's own values win, which they do when it is absent
  or last, as in Hydra >= 1.1).

Inside the section, the five ``*_weight`` keys set the weights (a missing one
keeps its default); ``mouth_indices``, ``expression_indices`` and ``layout``
set the perceptual column groups, by column number or by name (see
:mod:`koemorph_fused.blendshapes`)::

    loss:
      _target_: src.model.losses.KoeMorphLoss   # Hydra's keys (_target_, _partial_, ...) are ignored
      perceptual_weight: 0.7
      layout: live_link_face
      mouth_indices: ["jaw*", "mouth*"]
      expression_indices: ["brow*", "eye*", "cheek*", "nose*"]

Any other key is an error (the original KoeMorph loss's ``sparsity_weight``,
``smoothness_weight``, ``landmark_weight`` and ``velocity_weight`` are other
losses' terms: this loss has none of them). Values must be plain numbers: an
OmegaConf interpolation (``${...}``) is an error that says so.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Union

from .blendshapes import Layout, resolve
from .blendshapes import layout as layout_names
from .terms import EXPRESSION_INDICES, MOUTH_INDICES
from .weights import CONFIG_KEYS, LossWeights

#: Where the loss section is looked for, in this order (dotted paths).
SEARCH_PATHS: tuple[str, ...] = ("loss", "training.loss", "model.loss")
#: Keys of the loss section that set the perceptual column groups.
GROUP_KEYS: tuple[str, ...] = ("mouth_indices", "expression_indices", "layout")
_HYDRA_KEY = re.compile(r"^_[A-Za-z0-9]+_$")  # _target_, _partial_, _recursive_, _convert_, _args_
_MAX_DEPTH = 16


class ConfigError(ValueError):
    """A config file that cannot be read as loss weights; the message names the file (and key)."""


class LossConfig(NamedTuple):
    """What :func:`load_loss_config` read.

    Attributes:
        weights: the five weights (defaults where the config has no key).
        mouth_indices, expression_indices: the perceptual column groups as
            column numbers (the seed's positional defaults where the config
            names none).
        layout: the config's ``layout:`` value, or None.
        section: where the section was found, e.g. ``"training.loss"``.
        files: the files read, the given one first.
    """

    weights: LossWeights
    mouth_indices: tuple[int, ...]
    expression_indices: tuple[int, ...]
    layout: Optional[Layout]
    section: str
    files: tuple[str, ...]

    def module_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~koemorph_fused.FusedKoeMorphLoss` (or the reference module)."""
        return {**self.weights.to_config(), "mouth_indices": self.mouth_indices,
                "expression_indices": self.expression_indices}

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`~koemorph_fused.temporal_loss` (or the reference)."""
        return {"weights": self.weights, "mouth_indices": self.mouth_indices,
                "expression_indices": self.expression_indices}


def _read_yaml(name: str) -> Any:
    import yaml

    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        raise type(e)(e.errno, f"cannot read loss config {name!r}: {e.strerror}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          "save the config as UTF-8") from None
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: not valid YAML: {e}") from e


def _package_header(text: str) -> Optional[str]:
    """The ``# @package X`` directive of a Hydra config file (in its leading comments), or None."""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if not line.startswith("#"):
            break
        m = re.match(r"#\s*@package\s+(\S+)", line)
        if m:
            return m.group(1)
    return None


def _merge(into: dict, other: Mapping) -> None:
    """Deep merge: ``other``'s values win; mappings merge key by key."""
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = _copy(value)


def _copy(value: Any) -> Any:
    return {k: _copy(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def _place(config: dict, package: str, content: Mapping) -> None:
    """Merge ``content`` into ``config`` at the dotted ``package`` ('' = the root)."""
    node = config
    for part in [p for p in package.split(".") if p]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    _merge(node, content)


def _defaults_entries(defaults: Any) -> list[tuple[str, str]]:
    """(group path, option) of each group default, '_self_' as ('_self_', ''), in order;
    ``override`` entries replace an earlier entry of the same group."""
    entries: list[tuple[str, str, str]] = []  # (key incl. @package, option, group)
    if not isinstance(defaults, list):
        return []
    for item in defaults:
        if item == "_self_":
            entries.append(("_self_", "", ""))
        elif isinstance(item, str):  # "group/name" or "name": a config, not a group default
            group, _, option = item.rpartition("/")
            entries.append((group, option, group))
        elif isinstance(item, Mapping) and len(item) == 1:
            (key, option), = item.items()
            if not isinstance(key, str) or not isinstance(option, str):  # null / a list of options
                continue
            override = key.startswith("override ")
            key = key.split()[-1]  # drop "optional" / "override"
            group = key.split("@")[0]
            replaced = False
            if override:
                for i, (_, _, g) in enumerate(entries):
                    if g.lstrip("/") == group.lstrip("/"):
                        entries[i] = (key, option, group)
                        replaced = True
            if not replaced:
                entries.append((key, option, group))
    return [(key, option) for key, option, _ in entries]


def _compose(name: str, config: dict, depth: int, files: list[str], missing: list[str]) -> dict:
    """The config Hydra would compose from ``name`` (see the module docstring)."""
    entries = _defaults_entries(config.get("defaults"))
    own = {k: v for k, v in config.items() if k != "defaults"}
    if not entries or depth >= _MAX_DEPTH:
        return _copy(own)
    if ("_self_", "") not in entries:
        entries.append(("_self_", ""))
    directory = os.path.dirname(os.path.abspath(name))
    composed: dict = {}
    for key, option in entries:
        if key == "_self_":
            _merge(composed, own)
            continue
        group, _, package = key.partition("@")
        group = group.strip("/")
        path = os.path.join(directory, *group.split("/"), option + ".yaml") if group else \
            os.path.join(directory, option + ".yaml")
        if not os.path.isfile(path):
            missing.append(path)
            continue
        sub, sub_text = _read_yaml(path)
        files.append(path)
        if sub is None:
            continue
        if not isinstance(sub, Mapping):
            raise ConfigError(f"{path}: expected a YAML mapping (pulled in by the defaults of {name}), "
                              f"got {type(sub).__name__}")
        sub = _compose(path, dict(sub), depth + 1, files, missing)
        header = _package_header(sub_text)
        if package:
            target = package
        elif header is not None and header != "_group_":
            target = "" if header == "_global_" else header
        else:
            target = group.replace("/", ".")
        _place(composed, "" if target == "_global_" else target, sub)
    return composed


_ABSENT = object()


def _lookup(config: Mapping, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _check_plain(where: str, key: str, value: Any) -> None:
    if isinstance(value, str) and "${" in value:
        raise ConfigError(f"{where}.{key}: {value!r} is an OmegaConf interpolation; write the value itself "
                          "(or pass the resolved config: OmegaConf.to_container(cfg, resolve=True))")


def _indices_value(where: str, key: str, value: Any) -> Any:
    """A config's group value as the loss takes it: a list of ints, or names/patterns."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise TypeError(f"{where}.{key}: expected a list of column numbers or names, got {type(value).__name__}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise TypeError(f"{where}.{key}: expected column numbers or names, got {type(item).__name__} {item!r}")
    if len({isinstance(item, str) for item in value}) > 1:
        raise TypeError(f"{where}.{key} mixes names and column numbers {value!r}; give one or the other")
    return tuple(value)


def load_loss_config(
    path: Union[str, os.PathLike, Mapping[str, Any]], section: Optional[str] = None
) -> LossConfig:
    """Loss weights and perceptual column groups from a YAML config (see the module docstring).

    Args:
        path: a YAML file; or an already loaded (composed) config mapping, e.g.
            a Hydra ``DictConfig`` or a ``dict``.
        section: a dotted path to the loss section (e.g. ``"loss"``,
            ``"experiment.loss"``); None looks in :data:`SEARCH_PATHS`.

    Raises:
        FileNotFoundError / OSError: the file cannot be opened (naming it).
        ConfigError (a ValueError): not UTF-8, not YAML, not a mapping, no loss
            section (the message lists every place it looked), a section that
            is not a mapping, an unknown key, a negative / NaN / infinite
            weight, an unknown blend-shape name or layout.
        TypeError: a weight that is not a number, a group that is not a list
            of column numbers or names (naming the key and file).
    """
    files: list[str] = []
    missing: list[str] = []
    if isinstance(path, Mapping):
        name = "config"
        composed = _copy(path)
    elif isinstance(path, (str, os.PathLike)):
        name = os.fspath(path)
        config, _ = _read_yaml(name)
        files.append(name)
        if not isinstance(config, Mapping):
            raise ConfigError(f"{name}: expected a YAML mapping with a loss section, got {type(config).__name__}")
        composed = _compose(name, dict(config), 0, files, missing)
    else:
        raise TypeError(f"path must be a str, os.PathLike or a mapping, got {type(path).__name__}")
    if section is not None and not isinstance(section, str):
        raise TypeError(f"section must be a str (a dotted path) or None, got {type(section).__name__}")

    places = SEARCH_PATHS if section is None else (section,)
    found = next(((p, v) for p in places if (v := _lookup(composed, p)) is not _ABSENT), None)
    if found is None:
        looked = ", ".join(f"'{p}:'" for p in places)
        also = ""
        if len(files) > 1:
            also += f" and in the files its defaults list pulls in ({', '.join(files[1:])})"
        if missing:
            also += f"; defaults it could not find: {', '.join(missing)}"
        raise ConfigError(f"{name}: no loss section; looked for {looked} in {name}{also} "
                          f"(top-level keys: {sorted(map(str, composed))})")
    where, loss = found
    where = f"{name}: {where}"
    if not isinstance(loss, Mapping):
        raise ConfigError(f"{where} must be a mapping of *_weight keys, got {type(loss).__name__}")

    weights: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for key, value in loss.items():
        key_s = str(key)
        if _HYDRA_KEY.match(key_s):
            continue  # _target_, _partial_, ...: Hydra's, not ours
        _check_plain(where, key_s, value)
        if key_s in GROUP_KEYS:
            groups[key_s] = value
            continue
        if key_s not in CONFIG_KEYS:
            raise ConfigError(f"{where}.{key_s}: unknown key; expected some of {list(CONFIG_KEYS + GROUP_KEYS)} "
                              "(Hydra's _target_-style keys are ignored)")
        try:
            LossWeights.from_config({key: value})
        except TypeError as e:
            raise TypeError(f"{where}.{key_s}: {e}") from e
        except ValueError as e:
            raise ConfigError(f"{where}.{key_s}: {e}") from e
        weights[key_s] = value

    layout = groups.get("layout")
    if layout is not None:
        if not isinstance(layout, (str, list)):
            raise TypeError(f"{where}.layout: expected a layout name or a list of column names, "
                            f"got {type(layout).__name__}")
        try:
            layout_names(layout)  # a misspelt layout is an error even where no group uses it
        except (ValueError, TypeError) as e:
            message = str(e) if str(e).startswith("layout") else f"layout: {e}"
            raise (ConfigError if isinstance(e, ValueError) else TypeError)(f"{where}.{message}") from None
    resolved = {}
    for key, default in (("mouth_indices", MOUTH_INDICES), ("expression_indices", EXPRESSION_INDICES)):
        if key not in groups:
            resolved[key] = default
            continue
        spec = _indices_value(where, key, groups[key])
        try:
            resolved[key] = tuple(resolve(spec, layout, argument=key))
        except ValueError as e:
            raise ConfigError(f"{where}.{e}") from None
        except TypeError as e:
            raise TypeError(f"{where}.{e}") from None
    return LossConfig(LossWeights.from_config(weights), resolved["mouth_indices"], resolved["expression_indices"],
                      layout, found[0], tuple(files))


def load_loss_weights(
    path: Union[str, os.PathLike, Mapping[str, Any]], section: Optional[str] = None
) -> LossWeights:
    """The :class:`~koemorph_fused.LossWeights` of a config's loss section:
    :func:`load_loss_config` ``(path, section).weights`` (same places, same errors)."""
    return load_loss_config(path, section).weights


__all__ = ["ConfigError", "GROUP_KEYS", "LossConfig", "SEARCH_PATHS", "load_loss_config", "load_loss_weights"]
