"""The 52 ARKit blend-shape names, the column orders data comes in, and
column groups selected by name.

ARKit itself has no column order: ``ARFaceAnchor.blendShapes`` is a
dictionary keyed by ``ARFaceAnchor.BlendShapeLocation``. An order appears
only when someone writes the values into a row, and the common ones differ:

``"arkit"``
    The order of Apple's ``ARFaceAnchor.BlendShapeLocation`` reference page,
    which lists the locations by face region: left eye (7), right eye (7),
    mouth and jaw (27, ``jawForward, jawLeft, jawRight, jawOpen, mouthClose,
    mouthFunnel, mouthPucker, mouthLeft, mouthRight, ...``), eyebrows, cheeks
    and nose (10), tongue (1). Most code that stores "the ARKit 52" as a list
    uses this order.
``"koemorph"``
    The order of the original KoeMorph code: the ``ARKIT_BLENDSHAPES`` list in
    its ``src/model/dual_stream_attention.py``, which names the model's 52
    output columns. It is the ``"arkit"`` order, name for name.
``"live_link_face"``
    The column order of the CSV files that Epic's Live Link Face app exports
    (``Timecode,BlendShapeCount,EyeBlinkLeft,...,TongueOut,HeadYaw,...``,
    52 blend shapes followed by 9 head and eye rotations), which is also the
    order of the values in its Live Link UDP packets. The regions come in the
    ARKit order, but two pairs are swapped: ``JawRight, JawLeft`` (columns
    15, 16) and ``MouthRight, MouthLeft`` (21, 22). The CSV spells the names
    in PascalCase (``EyeBlinkLeft``); names here match case-insensitively.
    KoeMorph's own ``scripts/convert_livelink_data.py`` writes its training
    data in this order, so data converted with it is ``"live_link_face"``
    data even though the KoeMorph model names its columns in the ``"arkit"``
    order.
``"alphabetical"``
    ``sorted()`` of the names: what iterating over the sorted keys of ARKit's
    dictionary gives.

A *layout* argument is one of these names, or the data's own column names
(a sequence of strings, e.g. a CSV header without its ``Timecode`` and
``BlendShapeCount`` columns), for data in any other order.

Names match case-insensitively, and ARKit's raw string values with an
``_L`` / ``_R`` suffix (``eyeBlink_L``) match the ``...Left`` / ``...Right``
names. Patterns are :mod:`fnmatch` globs (``*``, ``?``, ``[abc]``) matched
the same way.

The seed's perceptual groups are *positional*, not named: mouth = columns
12..21 and expression = columns 0..9 whatever the data's order
(:data:`~koemorph_fused.MOUTH_INDICES`, :data:`~koemorph_fused.EXPRESSION_INDICES`,
still the default). :func:`seed_default_names` says which blend shapes they
hit in a layout; in the ARKit order the "mouth" group is
``eyeSquintRight, eyeWideRight, jawForward, jawLeft, jawRight, jawOpen,
mouthClose, mouthFunnel, mouthPucker, mouthLeft`` and the "expression" group
the first ten eye columns.

>>> indices("jaw*", layout="arkit")
(14, 15, 16, 17)
>>> indices("jawLeft", "JawRight", layout="live_link_face")
(15, 16)
>>> names(range(12, 16), layout="arkit")
('eyeSquintRight', 'eyeWideRight', 'jawForward', 'jawLeft')
>>> preset("semantic", layout="arkit").mouth_indices[:3]
(14, 15, 16)
"""

from __future__ import annotations

import difflib
import fnmatch
import numbers
import re
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional, Union

from .terms import EXPRESSION_INDICES, MOUTH_INDICES

#: The 52 names in the order of Apple's ``ARFaceAnchor.BlendShapeLocation`` reference (see the module docstring).
ARKIT: tuple[str, ...] = (
    # left eye
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft", "eyeSquintLeft",
    "eyeWideLeft",
    # right eye
    "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight", "eyeLookOutRight", "eyeLookUpRight", "eyeSquintRight",
    "eyeWideRight",
    # mouth and jaw
    "jawForward", "jawLeft", "jawRight", "jawOpen", "mouthClose", "mouthFunnel", "mouthPucker", "mouthLeft",
    "mouthRight", "mouthSmileLeft", "mouthSmileRight", "mouthFrownLeft", "mouthFrownRight", "mouthDimpleLeft",
    "mouthDimpleRight", "mouthStretchLeft", "mouthStretchRight", "mouthRollLower", "mouthRollUpper",
    "mouthShrugLower", "mouthShrugUpper", "mouthPressLeft", "mouthPressRight", "mouthLowerDownLeft",
    "mouthLowerDownRight", "mouthUpperUpLeft", "mouthUpperUpRight",
    # eyebrows, cheeks and nose
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight", "cheekPuff",
    "cheekSquintLeft", "cheekSquintRight", "noseSneerLeft", "noseSneerRight",
    # tongue
    "tongueOut",
)


def _swap(order: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out = list(order)
    i, j = out.index(a), out.index(b)
    out[i], out[j] = out[j], out[i]
    return tuple(out)


#: The Live Link Face CSV column order (camelCase here; the CSV writes ``EyeBlinkLeft``).
LIVE_LINK_FACE: tuple[str, ...] = _swap(_swap(ARKIT, "jawLeft", "jawRight"), "mouthLeft", "mouthRight")

#: The order of the original KoeMorph code's ``ARKIT_BLENDSHAPES`` (identical to :data:`ARKIT`).
KOEMORPH: tuple[str, ...] = ARKIT

#: The names sorted alphabetically.
ALPHABETICAL: tuple[str, ...] = tuple(sorted(ARKIT))

#: The named layouts: layout name -> the 52 names in column order.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "arkit": ARKIT,
    "koemorph": KOEMORPH,
    "live_link_face": LIVE_LINK_FACE,
    "alphabetical": ALPHABETICAL,
}

#: Patterns of the semantic groups: the mel stream's jaw and mouth shapes.
SEMANTIC_MOUTH: tuple[str, ...] = ("jaw*", "mouth*")
#: Patterns of the semantic groups: the emotion stream's brow, eye, cheek and nose shapes.
SEMANTIC_EXPRESSION: tuple[str, ...] = ("brow*", "eye*", "cheek*", "nose*")

#: Names of the presets :func:`preset` knows.
PRESETS: tuple[str, ...] = ("seed", "semantic")

Layout = Union[str, Sequence[str]]
_GLOB = re.compile(r"[*?\[]")


class Groups(NamedTuple):
    """The two column groups of the perceptual term, as the loss takes them:
    ``kf.FusedKoeMorphLoss(**groups._asdict())``."""

    mouth_indices: tuple
    expression_indices: tuple


def _key(name: str) -> str:
    """The matching key of a name or pattern: case-folded, ``_L``/``_R`` -> ``left``/``right``."""
    key = name.casefold()
    if key.endswith("_l"):
        key = key[:-2] + "left"
    elif key.endswith("_r"):
        key = key[:-2] + "right"
    return key


def _index(columns: Sequence[str]) -> dict[str, int]:
    """Matching key -> column number (in column order); duplicate keys are an error."""
    index: dict[str, int] = {}
    for i, c in enumerate(columns):
        j = index.setdefault(_key(c), i)
        if j != i:
            raise ValueError(f"layout: columns {j} ({columns[j]!r}) and {i} ({c!r}) have the same name")
    return index


#: Key -> column number of each named layout (computed once, at import).
_LAYOUT_INDEX: dict[str, dict[str, int]] = {name: _index(order) for name, order in LAYOUTS.items()}


def _layout_names(layout: Any) -> tuple[str, tuple[str, ...], dict[str, int]]:
    """(description for messages, column names, key -> column number) of a layout argument."""
    if isinstance(layout, str):
        name = layout if layout in LAYOUTS else layout.casefold().replace("-", "_")
        order = LAYOUTS.get(name)
        if order is None:
            close = difflib.get_close_matches(layout.casefold(), LAYOUTS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown layout {layout!r}{hint}; known layouts: {', '.join(LAYOUTS)}, or pass "
                             "the data's column names (a sequence of strings)")
        return f"layout {layout!r}", order, _LAYOUT_INDEX[name]
    if isinstance(layout, Sequence) and not isinstance(layout, (bytes, bytearray)):
        columns = tuple(layout)
        if not columns:
            raise ValueError("layout: a sequence of column names must not be empty")
        bad = [c for c in columns if not isinstance(c, str)]
        if bad:
            raise TypeError(f"layout: column names must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
        return f"the given {len(columns)}-column layout", columns, _index(columns)
    raise TypeError(f"layout must be one of {', '.join(map(repr, LAYOUTS))} or a sequence of column names, "
                    f"got {type(layout).__name__}")


def layout(name: Layout) -> tuple[str, ...]:
    """The column names of a layout, in column order.

    >>> layout("live_link_face")[14:18]
    ('jawForward', 'jawRight', 'jawLeft', 'jawOpen')
    """
    return _layout_names(name)[1]


def _suggest(pattern: str, columns: tuple[str, ...]) -> str:
    """'; closest: a, b' for a pattern or name that matched nothing ('' when nothing is close)."""
    prefixes = {}
    for c in columns:
        m = re.match(r"[A-Za-z][a-z]*", c)
        if m:
            prefixes.setdefault(m.group(0).casefold() + "*", m.group(0) + "*")
    candidates = {_key(c): c for c in columns}
    if _GLOB.search(pattern):
        candidates.update(prefixes)
    close = difflib.get_close_matches(_key(pattern), list(candidates), n=3, cutoff=0.6)
    return f"; closest: {', '.join(candidates[k] for k in close)}" if close else ""


def _match(patterns: tuple[Any, ...], layout_arg: Any, argument: str) -> tuple[int, ...]:
    where, columns, index = _layout_names(layout_arg)
    selected: set[int] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{argument}: names and patterns must be strings, got {type(pattern).__name__} "
                            f"{pattern!r}")
        pat = _key(pattern)
        glob = _GLOB.search(pat) is not None
        if glob:
            match = re.compile(fnmatch.translate(pat)).match
            hits = [i for k, i in index.items() if match(k)]
        else:
            hits = [index[pat]] if pat in index else []
        if not hits:
            what = "pattern" if glob else "name"
            raise ValueError(f"{argument}: {what} {pattern!r} matches no column of {where}"
                             f"{_suggest(pattern, columns)}")
        selected.update(hits)
    return tuple(sorted(selected))


def indices(*patterns: str, layout: Layout) -> tuple[int, ...]:
    """Column numbers of the blend shapes that the names or glob patterns select
    in ``layout``, ascending, each column once.

    Args:
        *patterns: names (``"jawOpen"``, ``"JawOpen"``, ``"eyeBlink_L"``) or
            :mod:`fnmatch` patterns (``"mouth*"``, ``"eye*Left"``), matched
            case-insensitively.
        layout: ``"arkit"``, ``"koemorph"``, ``"live_link_face"``,
            ``"alphabetical"``, or the data's column names.

    Raises:
        ValueError: an unknown layout, or a name or pattern that matches no
            column (the message suggests the closest names).
        TypeError: a pattern that is not a string.

    >>> indices("mouthLeft", "mouthRight", layout="live_link_face")
    (21, 22)
    """
    return _match(patterns, layout, "indices")


def names(columns: Any, layout: Layout) -> tuple[str, ...]:
    """The names of the given column numbers in ``layout`` (negative numbers
    count from the end).

    >>> names([17, -1], layout="arkit")
    ('jawOpen', 'tongueOut')
    """
    where, order, _ = _layout_names(layout)
    out = []
    for i in columns:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"column numbers must be ints, got {type(i).__name__} {i!r}")
        if not -len(order) <= i < len(order):
            raise ValueError(f"column {i} is outside {where} ({len(order)} columns)")
        out.append(order[int(i)])
    return tuple(out)


def resolve(spec: Any, layout: Optional[Layout] = None, *, argument: str = "indices") -> Any:
    """What the loss does with a ``mouth_indices`` / ``expression_indices``
    argument before validating it: names and patterns become column numbers.

    * A string, or a list or tuple that starts with a string: names or
      patterns, resolved in ``layout`` with :func:`indices` (a set: each
      column once, ascending). ``layout`` is then required.
    * Anything else (ints, a range, an integer tensor) is positional and is
      returned unchanged, for the loss's own index checks (which reject a
      string later in a list of ints).

    Raises:
        ValueError: names without a layout, or see :func:`indices`.
        TypeError: a list that mixes names and column numbers.
    """
    if layout is not None:
        _layout_names(layout)  # a misspelt layout is an error even where numbers make it unneeded
    if isinstance(spec, str):
        patterns: tuple[Any, ...] = (spec,)
    elif isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], str):
        patterns = tuple(spec)
        mixed = [item for item in patterns if not isinstance(item, str)]
        if mixed:
            raise TypeError(f"{argument} mixes names and {type(mixed[0]).__name__} {mixed[0]!r}; give either "
                            "column numbers or blend-shape names/patterns")
    else:
        return spec
    if layout is None:
        raise ValueError(f"{argument} holds names {list(patterns)!r}: say which column order the data has "
                         f"with layout= (one of {', '.join(map(repr, LAYOUTS))}, or the data's column names)")
    return _match(patterns, layout, argument)


def preset(name: str, layout: Optional[Layout] = None) -> Groups:
    """The column groups of a preset, as column numbers.

    * ``"seed"``: the seed's positional groups, mouth = columns 12..21 and
      expression = 0..9 in any layout (the loss's default).
    * ``"semantic"``: mouth = jaw and mouth shapes (:data:`SEMANTIC_MOUTH`),
      expression = brow, eye, cheek and nose shapes
      (:data:`SEMANTIC_EXPRESSION`), found by name in ``layout`` (required).
      ``tongueOut`` is in neither (KoeMorph's dual-stream model routes it to
      the mouth stream: add ``"tongueOut"`` to the mouth patterns for that).

    >>> preset("semantic", layout="live_link_face").expression_indices[-4:]
    (47, 48, 49, 50)
    """
    if name == "seed":
        resolve(MOUTH_INDICES, layout)  # checks a given layout
        return Groups(MOUTH_INDICES, EXPRESSION_INDICES)
    if name == "semantic":
        if layout is None:
            raise ValueError("preset 'semantic' selects by name: give layout=")
        return Groups(_match(SEMANTIC_MOUTH, layout, "mouth_indices"),
                      _match(SEMANTIC_EXPRESSION, layout, "expression_indices"))
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")


def seed_default_names(layout: Layout) -> Groups:
    """Which blend shapes the seed's positional default groups (mouth = columns
    12..21, expression = 0..9) hit in ``layout``, as names.

    >>> seed_default_names("arkit").mouth_indices[-4:]
    ('mouthClose', 'mouthFunnel', 'mouthPucker', 'mouthLeft')
    """
    return Groups(names(MOUTH_INDICES, layout), names(EXPRESSION_INDICES, layout))


__all__ = [
    "ALPHABETICAL", "ARKIT", "Groups", "KOEMORPH", "LAYOUTS", "LIVE_LINK_FACE", "PRESETS", "SEMANTIC_EXPRESSION",
    "SEMANTIC_MOUTH", "indices", "layout", "names", "preset", "resolve", "seed_default_names",
]
