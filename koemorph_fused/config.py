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
``defaults:`` list. A config is read as the user's training run reads it:

* a file with a ``defaults:`` list, a ``hydra:`` section or a
  ``# @package`` header is composed by Hydra itself
  (``hydra.initialize_config_dir`` on the file's folder, then
  ``hydra.compose``): entries, ``override``, ``optional``, ``_self_``,
  ``@package`` and a leading ``/`` (the config folder, never the filesystem
  root) mean what they mean to Hydra, and whatever Hydra rejects (a missing
  entry, a config that includes itself, a key Hydra's ``hydra:`` schema
  does not have) is a :class:`ConfigError`. This
  needs ``hydra-core`` (``pip install 'koemorph_fused[config]'``);
* any other file is read by OmegaConf's loader (``2e-1`` is a float,
  a duplicate key is an error) or, without ``omegaconf``, by PyYAML;
* ``${...}`` interpolations in the loss section are resolved by OmegaConf.

Before a file reaches a YAML loader it is checked cheaply (:data:`LIMITS`:
size, node count with aliases expanded, nesting depth, recursive aliases), so
that a malformed, huge, deep or recursive config ends in a one-line
:class:`ConfigError` within a second rather than a hang or a RecursionError.

:func:`load_loss_config` and :func:`load_loss_weights` then look for the loss
section at ``loss:``, ``training.loss:`` and ``model.loss:`` of the composed
config, in this order, and take the first they find. Inside it, the five
``*_weight`` keys set the weights (a missing one keeps its default);
``velocity_weight`` (>= 0, default 0) is the weight of the sequence loss's
velocity term; ``mouth_indices``, ``expression_indices`` and ``layout`` set
the perceptual column groups, by column number or by name (see
:mod:`koemorph_fused.blendshapes`)::

    loss:
      _target_: src.model.losses.KoeMorphLoss   # Hydra's keys (_target_, _partial_, ...) are ignored
      perceptual_weight: 0.7
      layout: live_link_face
      mouth_indices: ["jaw*", "mouth*"]
      expression_indices: ["brow*", "eye*", "cheek*", "nose*"]

Any other key is an error (the original KoeMorph loss's ``sparsity_weight``,
``smoothness_weight`` and ``landmark_weight`` are other losses' terms).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Optional, Union

from .blendshapes import Layout, resolve
from .blendshapes import layout as layout_names
from .terms import EXPRESSION_INDICES, MOUTH_INDICES
from .weights import CONFIG_KEYS, LossWeights, _check_weight

#: Where the loss section is looked for, in this order (dotted paths).
SEARCH_PATHS: tuple[str, ...] = ("loss", "training.loss", "model.loss")
#: Keys of the loss section that set the perceptual column groups.
GROUP_KEYS: tuple[str, ...] = ("mouth_indices", "expression_indices", "layout")
#: The key of the sequence loss's velocity weight (carried in :attr:`LossConfig.velocity_weight`).
VELOCITY_KEY = "velocity_weight"
#: What a config file may be before a YAML loader sees it: bytes per file, YAML
#: nodes per file (aliases counted as often as they are used), nesting depth
#: (through aliases), YAML files under the folder of a config with a
#: ``defaults:`` list, and directory entries looked at there.
LIMITS: dict[str, int] = {"bytes": 64 * 1024, "nodes": 10_000, "depth": 64, "files": 500, "entries": 10_000}
_HYDRA_KEY = re.compile(r"^_[A-Za-z0-9]+_$")  # _target_, _partial_, _recursive_, _convert_, _args_
# An alias (*name) where YAML allows one: files without any skip the full check.
_ALIAS = re.compile(r"(?:^|[\s\[{,:?-])\*[^\s,\[\]{}]")
# Quoted strings and comments, whose brackets do not nest anything.
_NOT_FLOW = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\n]|\'\')*\'|(?:^|(?<=\s))#[^\n]*', re.M)
_FLOW = re.compile(r"[\[\]{}]")
# The indentation of a line, "- " entries included: block nesting needs at least one column per level.
_INDENT = re.compile(r"^[ \t-]*", re.M)
# The top-level keys that only Hydra reads right (a config with one, or
# with a '# @package' header, is composed by Hydra), and a header line.
_HEADER_LINE = re.compile(r"#\s*@")
_PACKAGE_LINE = re.compile(r"#\s*@package(\s|$)")
_HYDRA_SECTIONS = {"defaults": "a Hydra defaults: list", "hydra": "a hydra: section"}
_INSTALL = "pip install 'koemorph_fused[config]' (or: pip install 'hydra-core>=1.3,<1.4')"


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
        velocity_weight: the ``velocity_weight`` key (0.0 when absent): the
            weight of the sequence loss's velocity term, for
            ``FusedKoeMorphSequenceLoss(velocity_weight=...)``.
    """

    weights: LossWeights
    mouth_indices: tuple[int, ...]
    expression_indices: tuple[int, ...]
    layout: Optional[Layout]
    section: str
    files: tuple[str, ...]
    velocity_weight: float = 0.0

    def _layout_kwargs(self) -> dict[str, Any]:
        # The layout goes along with the resolved groups, so that data of
        # another width is still an error (a shifted CSV), as with the names.
        return {} if self.layout is None else {"layout": self.layout}

    def module_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~koemorph_fused.FusedKoeMorphLoss` (or the reference module)."""
        return {**self.weights.to_config(), "mouth_indices": self.mouth_indices,
                "expression_indices": self.expression_indices, **self._layout_kwargs()}

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`~koemorph_fused.temporal_loss` (or the reference)."""
        return {"weights": self.weights, "mouth_indices": self.mouth_indices,
                "expression_indices": self.expression_indices, **self._layout_kwargs()}

    def sequence_module_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~koemorph_fused.FusedKoeMorphSequenceLoss`
        (or the reference module): :meth:`module_kwargs` and ``velocity_weight``."""
        return {**self.module_kwargs(), VELOCITY_KEY: self.velocity_weight}

    def sequence_loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`~koemorph_fused.sequence_loss` (or the
        reference): :meth:`loss_kwargs` and ``velocity_weight``."""
        return {**self.loss_kwargs(), VELOCITY_KEY: self.velocity_weight}


def _first_line(e: BaseException) -> str:
    """The message's first line, with the second where the first only leads
    into it (Hydra's "In 'x': ConfigKeyError raised while composing config:")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else type(e).__name__


def _read_text(name: str) -> str:
    """The file's text: at most LIMITS["bytes"], UTF-8 (errors name the file)."""
    try:
        with open(name, "rb") as f:
            data = f.read(LIMITS["bytes"] + 1)
    except OSError as e:
        raise type(e)(e.errno, f"cannot read loss config {name!r}: {e.strerror}") from e
    if len(data) > LIMITS["bytes"]:
        raise ConfigError(f"{name}: larger than {LIMITS['bytes'] // 1024} KiB; a training config is far smaller "
                          "(is this the right file?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          "save the config as UTF-8") from None


def _flow_depth(name: str, text: str) -> None:
    """Refuse deeply nested ``[[[...`` / ``{{{...`` before PyYAML's scanner,
    which looks ahead through every open bracket (seconds for a few thousand)."""
    depth = 0
    for m in _FLOW.finditer(_NOT_FLOW.sub("", text)):
        depth = depth + 1 if m.group() in "[{" else max(depth - 1, 0)
        if depth > LIMITS["depth"]:
            line = text.count("\n", 0, m.start()) + 1 if "\n" in text else 1
            raise ConfigError(f"{name}:{line}: nested more than {LIMITS['depth']} levels deep")


def _check_structure(name: str, text: str, *, strict: bool = True) -> tuple[Optional[str], Optional[str]]:
    """Walk the YAML event stream (no recursion, no objects built) and check
    :data:`LIMITS`, recursive and undefined aliases and duplicate keys.

    Returns (kind of the root node: "mapping", "sequence", "scalar" or None
    for an empty file; what makes it a config only Hydra reads right, or
    None: a top-level ``defaults`` list or ``hydra`` section, or a
    ``# @package`` header).
    With ``strict`` False, a syntax error is left for the loader that reads
    the file to report (Hydra names it), and so is a duplicate key."""
    import yaml

    _flow_depth(name, text)
    # Per open collection: [anchor, expanded nodes before it, deepest child depth, keys seen, is mapping, child #]
    stack: list[list[Any]] = []
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (expanded nodes, depth) of its finished node
    open_anchors: set[str] = set()
    nodes = 0
    root: Optional[str] = None
    hydra = "a '# @package' header" if _has_package_header(text) else None

    def add(size: int, depth: int, key: Optional[str], line: int) -> None:
        nonlocal nodes, hydra
        nodes += size
        if nodes > LIMITS["nodes"]:
            raise ConfigError(f"{name}: more than {LIMITS['nodes']} YAML nodes (aliases counted each time they "
                              "are used); a training config is far smaller")
        if len(stack) + depth > LIMITS["depth"]:
            raise ConfigError(f"{name}:{line}: nested more than {LIMITS['depth']} levels deep")
        if stack:
            parent = stack[-1]
            parent[2] = max(parent[2], depth + 1)
            if parent[4] and parent[5] % 2 == 0 and key is not None:  # a mapping key
                if key in parent[3] and strict:
                    raise ConfigError(f"{name}:{line}: duplicate key {key!r}")
                parent[3].add(key)
                if len(stack) == 1 and key in _HYDRA_SECTIONS:
                    hydra = _HYDRA_SECTIONS[key]
            parent[5] += 1

    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            line = event.start_mark.line + 1 if event.start_mark is not None else 0
            if isinstance(event, yaml.AliasEvent):
                if event.anchor in open_anchors:
                    raise ConfigError(f"{name}:{line}: the alias *{event.anchor} refers to a node that contains it "
                                      "(a recursive alias)")
                if event.anchor not in anchors:
                    raise ConfigError(f"{name}:{line}: the alias *{event.anchor} has no anchor &{event.anchor} "
                                      "before it")
                size, depth = anchors[event.anchor]
                add(size, depth, None, line)
            elif isinstance(event, yaml.ScalarEvent):
                if not stack:
                    root = "scalar"
                add(1, 0, event.value, line)
                if event.anchor is not None:
                    anchors[event.anchor] = (1, 0)
            elif isinstance(event, yaml.CollectionStartEvent):
                if not stack:
                    root = "mapping" if isinstance(event, yaml.MappingStartEvent) else "sequence"
                if len(stack) + 1 > LIMITS["depth"]:
                    raise ConfigError(f"{name}:{line}: nested more than {LIMITS['depth']} levels deep")
                stack.append([event.anchor, nodes, 0, set(), isinstance(event, yaml.MappingStartEvent), 0])
                if event.anchor is not None:
                    open_anchors.add(event.anchor)
            elif isinstance(event, yaml.CollectionEndEvent):
                anchor, before, depth, _, _, _ = stack.pop()
                size = nodes - before + 1
                nodes = before
                add(size, depth, None, line)
                if anchor is not None:
                    open_anchors.discard(anchor)
                    anchors[anchor] = (size, depth)
            elif isinstance(event, yaml.DocumentStartEvent) and root is not None:
                raise ConfigError(f"{name}:{line}: more than one YAML document (a second '---'); "
                                  "a config is one document")
    except yaml.MarkedYAMLError as e:
        if not strict:
            return root, hydra
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        raise ConfigError(f"{where}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        if not strict:
            return root, hydra
        raise ConfigError(f"{name}: not valid YAML: {_first_line(e)}") from None
    return root, hydra


def _has_package_header(text: str) -> bool:
    """Whether the file's header has a ``# @package`` line, as Hydra reads a
    header: the lines before the first that is neither blank nor ``# @...``
    (split as ``str.splitlines`` splits, as Hydra does)."""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if not _HEADER_LINE.match(line):
            return False
        if _PACKAGE_LINE.match(line):
            return True
    return False


def _check_folder(root: str, primary: str) -> None:
    """Check every YAML file Hydra could read from the config folder ``root``
    (bounded: :data:`LIMITS` ``files`` and ``entries``), before Hydra reads any."""
    entries = files = 0
    folders = [root]
    seen = {os.path.realpath(root)}  # symlinked folders are followed (Hydra reads them), each folder once
    while folders:
        folder = folders.pop()
        try:
            listing = list(os.scandir(folder))
        except OSError:
            continue  # Hydra cannot read it either
        for entry in listing:
            entries += 1
            if entries > LIMITS["entries"]:
                raise ConfigError(f"{primary}: its folder {root} holds more than {LIMITS['entries']} files and "
                                  "folders; Hydra composes from the config's folder: keep the configs in a "
                                  "folder of their own")
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                real = os.path.realpath(entry.path)
                if real not in seen:
                    seen.add(real)
                    folders.append(entry.path)
            elif entry.name.endswith(".yaml") and entry.path != primary:
                files += 1
                if files > LIMITS["files"]:
                    raise ConfigError(f"{primary}: its folder {root} holds more than {LIMITS['files']} YAML "
                                      "files; keep the configs in a folder of their own")
                text = _read_text(entry.path)
                if _ALIAS.search(text) or max(map(len, _INDENT.findall(text)), default=0) > LIMITS["depth"]:
                    _check_structure(entry.path, text, strict=False)
                else:
                    _flow_depth(entry.path, text)


def _outside_folders(path: str, root: str) -> list[str]:
    """The folders outside ``root`` that Hydra also reads for the primary
    config ``path``: its ``hydra.searchpath`` ``file://`` entries and the
    folders that ``defaults`` entries with ``..`` climb to (a whole folder is
    checked, as for ``root``: bounded, never a hang)."""
    import yaml

    data = yaml.safe_load(_read_text(path))  # the primary passed _check_structure
    if not isinstance(data, dict):
        return []
    folders = []
    hydra = data.get("hydra")
    search = hydra.get("searchpath") if isinstance(hydra, dict) else None
    for entry in search if isinstance(search, list) else []:
        if isinstance(entry, str) and entry.startswith("file://"):
            folders.append(os.path.abspath(entry[len("file://"):]))
    defaults = data.get("defaults")
    for entry in defaults if isinstance(defaults, list) else []:
        names = [entry] if isinstance(entry, str) else list(entry) if isinstance(entry, dict) else []
        for name in names:
            words = str(name).split("@")[0].split()  # "g", "optional g", "override ../g", "g@pkg"
            group = words[-1] if words else ""
            if ".." in group.split("/"):
                folders.append(os.path.normpath(os.path.join(root, os.path.dirname(group) or ".")))
    return folders


def _load_file(name: str) -> tuple[Any, tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(the composed config, the files read, (file, package) of each in the
    order Hydra merges them) of a config file."""
    text = _read_text(name)
    root, hydra = _check_structure(name, text)
    if root != "mapping":
        got = "an empty file" if root is None else f"a YAML {root}"
        raise ConfigError(f"{name}: expected a YAML mapping with a loss section, got {got}")
    if hydra is not None:
        return _compose_with_hydra(name, hydra)
    try:
        from omegaconf import OmegaConf
    except ImportError:
        import yaml

        return yaml.safe_load(text), (name,), ()
    try:
        return OmegaConf.create(text), (name,), ()
    except Exception as e:  # the checks above leave little: a tag OmegaConf does not take, ...
        raise ConfigError(f"{name}: OmegaConf cannot read it: {_first_line(e)}") from None


def _compose_with_hydra(name: str, why: str) -> tuple[Any, tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Compose ``name`` as Hydra does: ``initialize_config_dir`` on its folder,
    then ``compose``; ``why`` says what makes it a Hydra config."""
    try:
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from hydra.initialize import get_gh_backup, restore_gh_from_backup
        from hydra.types import RunMode
    except ImportError:
        raise ConfigError(f"{name}: has {why}; composing it needs hydra-core: {_INSTALL}") from None
    path = os.path.abspath(name)
    root, base = os.path.split(path)
    config_name, ext = os.path.splitext(base)
    if ext != ".yaml":
        raise ConfigError(f"{name}: has {why}, but Hydra composes only .yaml files; "
                          f"rename it to {config_name}.yaml")
    _check_folder(root, path)
    for folder in _outside_folders(path, root):
        _check_folder(folder, path)
    # Inside a running Hydra app (@hydra.main) Hydra is already initialized:
    # set its state aside for this composition and put it back afterwards.
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=root, version_base="1.3", job_name="koemorph_fused"):
            cfg = compose(config_name=config_name)
            defaults = GlobalHydra.instance().config_loader().compute_defaults_list(
                config_name=config_name, overrides=[], run_mode=RunMode.RUN)
    except RecursionError:
        raise ConfigError(f"{name}: Hydra cannot compose it: maximum recursion depth exceeded (its defaults lists "
                          "include a config from itself, directly or through others, e.g. 'defaults: [a, a]' in "
                          "a.yaml)") from None
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{name}: Hydra cannot compose it: {_first_line(e)}") from None
    finally:
        restore_gh_from_backup(backup)
    files, sources = [path], []
    for d in defaults.defaults:  # the configs Hydra read, in order; its own (hydra/...) come from its package
        file = os.path.normpath(os.path.join(root, d.config_path + ".yaml")) if d.config_path else None
        if file is not None and os.path.isfile(file):
            sources.append((file, d.package or ""))
            if file not in files:
                files.append(file)
    return cfg, tuple(files), tuple(sources)


def _source_of(sources: tuple[tuple[str, str], ...], dotted: str) -> Optional[str]:
    """The file whose value of ``dotted`` the composed config holds: the last
    one, in Hydra's merge order, that sets it (None where none does, e.g. an
    interpolation made it)."""
    import yaml

    for file, package in reversed(sources):
        try:
            data = yaml.safe_load(_read_text(file))  # checked (LIMITS) before Hydra read it
        except Exception:
            continue
        prefix = "" if package in ("", "_global_") else package + "."
        if prefix and not dotted.startswith(prefix):
            continue
        if isinstance(data, Mapping) and _lookup(data, dotted[len(prefix):]) is not _ABSENT:
            return file
    return None


def _file_of(name: str, sources: tuple[tuple[str, str], ...], dotted: str) -> str:
    """The file an error about ``dotted`` names: the one of ``name``'s
    defaults list that sets it (see :func:`_source_of`), or ``name``."""
    source = _source_of(sources, dotted) if sources else None
    if source is None or source == os.path.abspath(name):
        return name
    return f"{source} (in the defaults of {name})"


_ABSENT = object()


class _Unset(NamedTuple):
    """What :func:`_lookup` finds where a value on the way is OmegaConf's
    mandatory ``???``, never set: ``key``, the dotted key that is."""

    key: str


def _lookup(config: Mapping, dotted: str) -> Any:
    node: Any = config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if _is_missing(node, part):  # OmegaConf: `part in node` is False for a ??? value
            return _Unset(".".join(parts[:i + 1]))
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _is_missing(node: Any, key: str) -> bool:
    """Whether ``node[key]`` is OmegaConf's mandatory ``???``, never set."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:
        return False
    return isinstance(node, DictConfig) and key in node.keys() and OmegaConf.is_missing(node, key)


def _plain(where: Callable[[Optional[str]], str], value: Any) -> Any:
    """An OmegaConf node as plain Python, its ``${...}`` resolved (errors name
    ``where(key)``, ``key`` the dotted key OmegaConf names, or None)."""
    try:
        from omegaconf import Container, OmegaConf
    except ImportError:
        return value
    if not isinstance(value, Container):
        return value
    try:
        return OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
    except Exception as e:
        raise ConfigError(f"{where(getattr(e, 'full_key', None))}: {_first_line(e)}") from None


def _indices_value(key: str, value: Any) -> Any:
    """A config's group value as the loss takes it: a list of ints, or names/patterns
    (errors start with ``key``)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise TypeError(f"{key}: expected a list of column numbers or names, got {type(value).__name__}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise TypeError(f"{key}: expected column numbers or names, got {type(item).__name__} {item!r}")
    if len({isinstance(item, str) for item in value}) > 1:
        raise TypeError(f"{key} mixes names and column numbers {value!r}; give one or the other")
    return tuple(value)


def _weight_type_error(where: str, key: str, value: Any, e: TypeError) -> TypeError:
    hint = ""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        hint = (f" (PyYAML reads {value!r} as text; with omegaconf installed it is a number, as in Hydra: "
                f"{_INSTALL})")
    return TypeError(f"{where}.{key}: {e}{hint}")


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
        ConfigError (a ValueError): not UTF-8, not YAML, over :data:`LIMITS`,
            a duplicate key, not a mapping, a ``defaults:`` list Hydra cannot
            compose (or no hydra-core to compose it), an interpolation that
            does not resolve, no loss section (the message lists every place
            it looked), a section that is not a mapping, an unknown key, a
            negative / NaN / infinite weight, an unknown blend-shape name or
            layout. Every message is one line that starts with the file.
        TypeError: a weight that is not a number, a group that is not a list
            of column numbers or names (naming the key and file).
    """
    if section is not None and not isinstance(section, str):
        raise TypeError(f"section must be a str (a dotted path) or None, got {type(section).__name__}")
    if isinstance(path, Mapping):
        name, composed, files, sources = "config", path, (), ()
    elif isinstance(path, (str, os.PathLike)):
        name = os.fspath(path)
        composed, files, sources = _load_file(name)
    else:
        raise TypeError(f"path must be a str, os.PathLike or a mapping, got {type(path).__name__}")

    places = SEARCH_PATHS if section is None else (section,)
    found, unset = None, []
    try:
        for place in places:  # the first place that holds a value; a ??? one is skipped
            value = _lookup(composed, place)
            if isinstance(value, _Unset):
                unset.append(value.key)
            elif value is not _ABSENT:
                found = place, value
                break
    except Exception as e:  # an interpolation on the way (loss: ${...}) that does not resolve
        raise ConfigError(f"{name}: {_first_line(e)}") from None
    if found is None and unset:
        raise ConfigError(f"{_file_of(name, sources, unset[0])}: {unset[0]} is ??? (a value that must be set, "
                          "e.g. on Hydra's command line), and nothing set it")
    if found is None:
        looked = ", ".join(f"'{p}:'" for p in places)
        also = f" and in the files its defaults list pulls in ({', '.join(files[1:])})" if len(files) > 1 else ""
        raise ConfigError(f"{name}: no loss section; looked for {looked} in {name}{also} "
                          f"(top-level keys: {sorted(map(str, composed))})")

    def at(key: Optional[str] = None, *, full: Optional[str] = None) -> str:
        """Where an error is: about ``key`` of the section, or about ``full``,
        a dotted key of the composed config that OmegaConf names (below the
        section, or elsewhere when an interpolation led there)."""
        if full and full.startswith(found[0] + "."):
            key = full[len(found[0]) + 1:]
        if full and key is None:
            dotted = full
        else:
            dotted = f"{found[0]}.{re.split(r'[.[]', key)[0]}" if key else found[0]
        return f"{_file_of(name, sources, dotted)}: {found[0]}"

    loss = _plain(lambda full: at(full=full), found[1])
    if not isinstance(loss, Mapping):
        raise ConfigError(f"{at()} must be a mapping of *_weight keys, got {type(loss).__name__}")

    weights: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    velocity = 0.0
    for key, value in loss.items():
        key_s = str(key)
        if _HYDRA_KEY.match(key_s):
            continue  # _target_, _partial_, ...: Hydra's, not ours
        if key_s in GROUP_KEYS:
            groups[key_s] = value
            continue
        if key_s not in CONFIG_KEYS and key_s != VELOCITY_KEY:
            raise ConfigError(f"{at(key_s)}.{key_s}: unknown key; expected some of "
                              f"{list(CONFIG_KEYS + (VELOCITY_KEY,) + GROUP_KEYS)} "
                              "(Hydra's _target_-style keys are ignored)")
        try:
            if key_s == VELOCITY_KEY:
                velocity = _check_weight("velocity", value)
            else:
                LossWeights.from_config({key: value})
        except TypeError as e:
            raise _weight_type_error(at(key_s), key_s, value, e) from None
        except ValueError as e:
            raise ConfigError(f"{at(key_s)}.{key_s}: {e}") from None
        if key_s != VELOCITY_KEY:
            weights[key_s] = value

    layout = groups.get("layout")
    if layout is not None:
        if not isinstance(layout, (str, list)):
            raise TypeError(f"{at('layout')}.layout: expected a layout name or a list of column names, "
                            f"got {type(layout).__name__}")
        try:
            layout_names(layout)  # a misspelt layout is an error even where no group uses it
        except (ValueError, TypeError) as e:
            message = str(e) if str(e).startswith("layout") else f"layout: {e}"
            raise (ConfigError if isinstance(e, ValueError) else TypeError)(f"{at('layout')}.{message}") from None
    resolved = {}
    for key, default in (("mouth_indices", MOUTH_INDICES), ("expression_indices", EXPRESSION_INDICES)):
        if key not in groups:
            resolved[key] = default
            continue
        try:
            resolved[key] = tuple(resolve(_indices_value(key, groups[key]), layout, argument=key))
        except ValueError as e:
            raise ConfigError(f"{at(key)}.{e}") from None
        except TypeError as e:
            raise TypeError(f"{at(key)}.{e}") from None
    return LossConfig(LossWeights.from_config(weights), resolved["mouth_indices"], resolved["expression_indices"],
                      layout, found[0], tuple(files), velocity)


def load_loss_weights(
    path: Union[str, os.PathLike, Mapping[str, Any]], section: Optional[str] = None
) -> LossWeights:
    """The :class:`~koemorph_fused.LossWeights` of a config's loss section:
    :func:`load_loss_config` ``(path, section).weights`` (same places, same errors)."""
    return load_loss_config(path, section).weights


__all__ = ["ConfigError", "GROUP_KEYS", "LIMITS", "LossConfig", "SEARCH_PATHS", "VELOCITY_KEY", "load_loss_config",
           "load_loss_weights"]
